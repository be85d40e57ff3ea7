"""Defenses against unauthorized compression: entangled expert training and selective fine-tuning protocols."""
