"""What a trained drafter is: the heads, the gate features and gates, the artifact on disk.

Used by both gate.train (which builds it) and gate.decode (which runs it); imports neither.
"""
