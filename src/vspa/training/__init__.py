"""Plumbing shared by the training loops (pretrain / oracle, adaptation, translator)."""
