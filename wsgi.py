from prefs import create_app

app = create_app()
