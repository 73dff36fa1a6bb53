"""Drop-in integrations with other libraries (PEFT, mergekit-style pipelines)."""
