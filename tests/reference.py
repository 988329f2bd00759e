"""Independent reference formulas the tests compare the library against (written from the seeds)."""


def drop_ratio(t, ts=40, te=140, d0=0.0, d1=0.35, gamma=2.0):
    """Seed 000 §2.2's d(t), case by case."""
    if t < ts:
        return d0
    if t >= te:
        return d1
    return d0 + ((t - ts) / (te - ts)) ** gamma * (d1 - d0)
