"""Training side: records -> heads + gates -> calibrated drafter artifact; evaluation and probes."""
