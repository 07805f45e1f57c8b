"""What a trained drafter is: the Drafter contract, heads, gate features and gates, the artifact formats.

    base.py      Drafter;  artifact.py: the folder (write, check);  load.py: FORMATS, read_meta, load_drafter
    heads.py / features.py / copyrule.py   heads, gate features and gates, the copy rule
    heads_drafter.py / eagle.py / router.py   the three drafters and their formats (docs/drafters.md)
    export.py    the feature head's tensors and config.json as an EAGLE-3 draft (train.py export)

Used by both gate.train (which builds it) and gate.decode (which runs it); imports neither.
"""
