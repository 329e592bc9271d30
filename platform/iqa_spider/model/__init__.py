"""Model factories: the tiny random Qwen-VL models of tests and the demo, and their tokenizer."""
