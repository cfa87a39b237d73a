"""Moved: studies live in ``lit_nas_study`` (above the core); ``python -m lit_nas.study`` still runs them."""
