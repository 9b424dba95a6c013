//! History within its byte budgets: memory (`--memory-budget`) and disk (`--max-disk`).
