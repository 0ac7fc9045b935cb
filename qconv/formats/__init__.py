"""Output formats qconv writes (GGUF and its tokenizer metadata, quantization file types)."""
