"""MQTT: the front door and sink of the cameras on a broker (service.py) and its wire format (protocol.py)."""
from .service import MqttService

__all__ = ["MqttService"]
