"""Research and data tools, kept apart from the inference core.

* :mod:`lckv.research.data` — the shared real data (stories260K, HotpotQA rows);
* :mod:`lckv.research.llama2c` — the llama2.c checkpoint loader (stories260K, for fast tests);
* :mod:`lckv.research.capture` — post-RoPE Q/K capture from a model on real text;
* :mod:`lckv.research.eval_data` — index evaluation sets built from those captures;
* :mod:`lckv.research.analysis` — attention analysis (received attention per key);
* :mod:`lckv.research.tasks` — synthetic long-context tasks (needles, variable tracking, word extraction).

The inference core (:mod:`lckv.cache`, :mod:`lckv.attention`, :mod:`lckv.policies`,
:mod:`lckv.ops`, :mod:`lckv.index`, :mod:`lckv.integrations`) never imports this package
(``tests/test_layering.py`` checks it); benchmarks, training and the demo (``python -m lckv``) do.
"""
