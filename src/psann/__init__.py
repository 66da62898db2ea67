"""psann: Parameterized Sine-Activated Neural Networks and the psann-lm language-model toolkit."""

__version__ = "0.1.0"
