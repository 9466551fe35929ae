"""actsparse: activation sparsity for LLM decoding, as a torch.compile backend."""
