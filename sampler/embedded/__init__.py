"""How the embedded default backbone and its judge were made: the corpus, the tokenizer, the checkable
tasks, pretraining (`jointgen pretrain`) and the acceptance check. Not part of the method: the rest of
`sampler/` uses only the tasks (task validity, `sampler.metrics.is_correct`) and the tokenizer trainer
(the test checkpoints of `sampler.testing`)."""
