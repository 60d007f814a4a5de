"""The built-in demo: tiny clinical and instruct Llama models made offline, and their study."""
