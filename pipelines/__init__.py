"""End-to-end workflows over the zoo: diffusers pipelines, LMM methods, probe training, demos."""
