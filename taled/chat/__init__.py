"""The conversation agent (the UX model): intent, conversations, answers about
the user's own tasks."""
