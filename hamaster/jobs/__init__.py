"""Job ids and the job cache (loads and returns) kept on a store."""
