"""GET/PUT/DELETE /admin/routes: the prompt router's routes, changed at run time."""
