"""Carrying bytes between clients and upstreams (docs/architecture.md).

- `listener`: the listening sockets, connection caps and the first look at a request;
- `bodies` and `spool`: receiving a request body whole before it takes the GPU (memory for
  small ones, a temporary file for large ones), its declared size checked once;
- `proxy`: relaying a job to its upstream and its answer back, buffered so that no client's
  pace reaches the lease;
- `responses`: a BrokerError as an HTTP answer;
- `redaction` and `logs`: what the log may say, and how often.
"""
