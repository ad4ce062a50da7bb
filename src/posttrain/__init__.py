"""posttrain: evaluate, fine-tune (SFT) and RL-train causal LMs on grade-school math.

Layers, lowest first (nothing imports a layer above its own; ``tests/test_layers.py`` checks it):

    utils, errors, config          plumbing used everywhere
    tasks                          data, prompts, answer extraction, grading, rewards
    engine                         model loading and generation (HF generate, our fast engine)
    evaluation                     the evaluation harness (tasks + engine)
    losses                         pure loss functions
    trainers                       SFT and RL training loops
    pipeline                       multi-stage runs with a report
    cli                            the ``posttrain`` command
"""

__version__ = "0.1.0"
