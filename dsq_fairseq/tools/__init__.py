"""Command-line helpers of the reproduction scripts (``python -m dsq_fairseq.tools.X``)."""
