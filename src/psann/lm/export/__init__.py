"""`psannlm export hf` and `psannlm import hf`: checkpoints to and from the Hugging Face format."""
