"""Config loading and service integration."""
