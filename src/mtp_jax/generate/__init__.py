"""Decoding with a KV cache: the library the generation command and speculative decoding build on.

cache.py   `Cache`: every trunk block's attention cache and each row's length; rollback is lowering it
sample.py  `sample`: greedy, temperature and top-p; `filtered_probs`, the distribution sampled from
decode.py  `prefill`, `step`: cached forward passes; `generate`: prompts in, new tokens out
speculative.py  `speculative_generate`: the MTP depths draft, the trunk verifies; `SpecStats`
load.py    `load`: a run's checkpoint step as a model with its weights, its tokenizer and config
cli.py     `mtp-generate`: parse the command line, print the text and statistics, one-line errors
"""
