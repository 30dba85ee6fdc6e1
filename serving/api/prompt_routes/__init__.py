"""GET/PUT/DELETE /admin/routes: the router's routes, changed at run time."""
