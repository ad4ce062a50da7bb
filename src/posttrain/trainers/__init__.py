"""Trainers: SFT and RL loops built on accelerate, plus shared plumbing."""
