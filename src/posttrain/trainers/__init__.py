"""Trainers: SFT, RL and pretraining, each a loop on the run scaffolding of run.py (see ARCHITECTURE.md)."""
