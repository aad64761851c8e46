"""Training: the data readers, the shared loop and checkpoints, the command-line jobs (the default
MiniLM classification job, the causal-LM fine-tune)."""
