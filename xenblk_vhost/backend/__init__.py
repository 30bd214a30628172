"""The service: xenbus state machine per device, one trio task per ring."""
