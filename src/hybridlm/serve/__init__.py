"""Serving: the service layer (service.py: text <-> token ids <-> inference/scheduler.py's
continuous batching) under the HTTP routes, and the policy modules around them (auth, limits,
safety, review, monitoring). Nothing is imported here, so the protocol and route modules load
without the model stack."""
