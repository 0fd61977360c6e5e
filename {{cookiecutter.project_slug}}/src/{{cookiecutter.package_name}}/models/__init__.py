"""The Hugging Face side: loading, the vocabulary, the LM head, the policy/reference pair, the sampler."""
