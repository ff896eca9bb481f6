"""The benchmark harness: the hot paths measured against floors taken in the same run."""
