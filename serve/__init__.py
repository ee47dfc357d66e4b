"""qwen-tts-fleet's streaming speech service on Ray Serve.

    serve run --address $RAY_ADDRESS_HOSTPORT configs/serve.yaml   # or: qtts serve [--config ...] [--address ...]

Layers: schemas (request models, errors) -> ingress (FastAPI transport) -> replica (one Engine per replica, step-loop
thread, per-session queues; scheduler.py) ; audio_format (streaming encoders), voices (voice store), app (build_app).
"""
