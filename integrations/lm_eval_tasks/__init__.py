"""lm-evaluation-harness tasks of this repository (`--include_path integrations/lm_eval_tasks`)."""
