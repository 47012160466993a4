"""HTTP inference service for AdaMTL checkpoints: `python -m service`, see docs/service.md."""
