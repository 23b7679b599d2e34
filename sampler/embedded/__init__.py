"""How the embedded default backbone and its judge were made: the corpus, the tokenizer, the checkable
tasks, pretraining and the acceptance check. Not part of the method: nothing in `sampler/` outside this
package needs it, except the evaluation's task validity (`sampler.metrics.is_correct`)."""
