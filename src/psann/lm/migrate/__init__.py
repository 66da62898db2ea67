"""Translation layers: the documented commands of earlier systems, run on psann-lm."""
