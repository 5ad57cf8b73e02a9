"""The transformers adapter: loading any Hugging Face causal LM, and the one-request-at-a-time engine over it
(scored by a forward hook, constrained by xgrammar), used for research and where vLLM does not run."""
