"""Base models and adapters: loading, hardware choices, the adapter's card and the base it is used on."""
