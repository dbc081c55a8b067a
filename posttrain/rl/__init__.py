"""The math of RL with verifiable rewards, as pure functions over tensors.

    kl.py          k1 / k2 / k3 sample KL estimators (in the loss or in the reward), policy entropy
    advantages.py  advantage estimators (registry): group z-score, group mean, RLOO, batch-normalised, GAE; whitening
    surrogate.py   the clipped policy-gradient surrogate (clip-higher, dual clip) and truncated importance sampling
    sampling.py    DAPO dynamic sampling: drop groups whose rewards are all equal, sample more until the batch is full
    value_head.py  a linear value head on the shared backbone (PPO / ReFT), saved beside the policy

The objectives that use them live in posttrain/objectives/ (grpo.py, ppo.py).
"""
