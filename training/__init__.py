"""VERL GRPO layer for in-context retrieval under KV compression (arXiv 2601.18527 recipe).

Modules: :mod:`training.data` (data builder and CLI), :mod:`training.prompts` (templates),
:mod:`training.rewards` (the five VERL reward functions), :mod:`training.judge` (LLM judge
client), :mod:`training.matching` (normalisation, fuzzy matching), :mod:`training.scorers`
(SubEM, relative drop, attention-ranking NDCG@10), :mod:`training.lckv_backend` (VERL
``external_lib`` registering lckv's attention backend). Configs in ``training/configs``, launch
scripts in ``training/scripts``. This directory is used from the repository root (it is not
installed with the lckv package).
"""
