"""The vLLM adapter, pinned to one vLLM version: the engine, the worker plugin and the score channel between them.

``plugin`` runs inside vLLM's workers (it is the ``vllm.general_plugins`` entry point) and reads the model
runner's batch layout; ``scores`` carries its per-token rows to the API process; ``engine`` is limbic's
``Engine`` over vLLM's ``AsyncLLM``. Nothing outside this package imports vLLM.
"""
