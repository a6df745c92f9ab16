"""Decoding with a KV cache: the library the generation command and speculative decoding build on.

cache.py   `Cache`: every trunk block's attention cache and each row's length; rollback is lowering it
sample.py  `sample`: greedy, temperature and top-p; `filtered_probs`, the distribution sampled from
decode.py  `prefill`, `step`: cached forward passes; `generate`: prompts in, new tokens out
speculative.py  `speculative_generate`: the MTP depths draft, the trunk verifies; `SpecStats`
drafters.py     `Sequential`, `Parallel`: each MTP kind's prefill, draft and after-verify steps
accept.py       `accept`: greedy acceptance, or rejection sampling that keeps plain sampling's distribution
load.py    `load`: a run's checkpoint step as a model with its weights, its tokenizer and config

The command `mtp-generate` is cli/generate.py.
"""
