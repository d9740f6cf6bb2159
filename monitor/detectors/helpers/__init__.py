"""What the detectors share and what a detector keeps apart from its rules: incidents named the same way
everywhere, the divergence and stall stories, robust trends and host-memory series, the warmup check,
the step a run-level event is stamped with. No detector here; ``trainhealth.detectors`` lists those."""
