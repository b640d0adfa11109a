"""HTTP: the web page, the REST and OpenAI-compatible APIs and the metrics of the cameras
(service.py serves them; app.py holds the routes, openai_api.py the OpenAI wire format)."""
from .service import HttpService

__all__ = ["HttpService"]
