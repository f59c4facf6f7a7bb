"""The model's building blocks (norm, rotary, linear, attention). They compute through the model's
backend (services/engine/backends), chosen once when the model loads."""
