"""Our `tensorrt_llm` Triton model: one token-id contract, two generators.

serving.py and request.py are the Triton-facing half both models share; llamacpp.py (continuous
batching with llama.cpp, the CPU stand-in) and llmapi.py (TensorRT-LLM's LLM API, production)
generate. The model repositories' model.py files only pick a generator.
"""
