"""Training subpackage (installed as ``dle_stream.training``): the two-photon movie simulator, its priors and presets, and the trainer."""
