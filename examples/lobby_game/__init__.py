"""Players wait in a lobby until the game starts: ``python -m examples.lobby_game``."""
