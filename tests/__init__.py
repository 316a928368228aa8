"""The test suite: unit/ (no servers), integration/ (real servers on 127.0.0.1), parity/
(against Meta's sam2==1.1.0); helpers/ is shared."""
