"""Serving: the continuous-batching engine (engine.py, batched_decode.py) and the service layer
(service.py: text <-> token ids <-> engine) under the HTTP routes. Nothing is imported here, so the
protocol and route modules load without the model stack."""
